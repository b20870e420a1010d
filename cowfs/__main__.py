from .fast import entry

entry()
