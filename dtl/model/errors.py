"""The one exception type of the project (re-exported as ``dtl.DTLError``)."""


class DTLError(Exception):
    """An error the user can fix: bad input, bad configuration, unreachable service.

    The CLI prints its message without a traceback and exits with status 2.
    """
