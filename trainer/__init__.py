"""trainer: the fast.ai training playbook as a command-line tool driven by YAML."""

__version__ = "0.1.0"
