"""Errors in what a caller gave, apart from bugs: the types of ``eoc_kernels.errors``, which every
check of both packages raises (subclasses of ``ValueError``, ``TypeError``, ``FileNotFoundError``).
The ``eoc`` command line turns exactly these into a one-line message with exit status 2.
"""

from eoc_kernels.errors import InputError, InputFileNotFoundError, InputTypeError, InputValueError

__all__ = ["InputError", "InputFileNotFoundError", "InputTypeError", "InputValueError"]
