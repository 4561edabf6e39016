"""One router per resource, assembled in service.app."""
