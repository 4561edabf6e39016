import sys

from evaluator.main import main

if __name__ == "__main__":
    sys.exit(main())
