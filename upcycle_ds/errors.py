"""User-facing errors: one line on stderr, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (flags, files, checkpoints). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class ReportedByAnotherRank(UserError):
    """A UserError of a multi-rank job that rank 0 reports: the other ranks exit 2 without printing it again."""


class Terminated(BaseException):
    """SIGTERM (or another terminating signal) arrived: unwind like KeyboardInterrupt, removing partial outputs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
