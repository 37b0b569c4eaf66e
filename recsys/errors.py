"""Errors caused by what the user gave us (a file, a config key, a checkpoint).

Entry points catch `UserInputError` and print its message as one line, without a traceback:
the message itself must name the file, column or key and say what is wrong.
"""


class UserInputError(ValueError):
    """Bad input from the user: printed as a one-line error by train.py / evaluate.py."""
