"""`cordumctl`: the command-line interface."""
