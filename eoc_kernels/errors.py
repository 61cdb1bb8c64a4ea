"""Errors in what a caller gave (arguments, files, configurations), apart from bugs.

Every check of eoc_kernels and of eoc_dit (which re-exports these as ``eoc_dit.errors``) raises one
of these on bad input. They subclass the built-in type a
caller would catch (``ValueError``, ``TypeError``, ``FileNotFoundError``), so ``except ValueError``
keeps working; the ``eoc`` command line turns exactly these into a one-line message with exit
status 2 and lets anything else (a bug) keep its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Base class: the input was wrong, not the program."""


class InputValueError(InputError, ValueError):
    """An argument, file or setting has a wrong value, shape or content."""


class InputTypeError(InputError, TypeError):
    """An argument has a wrong type."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file the caller named does not exist."""
