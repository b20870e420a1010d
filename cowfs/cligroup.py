"""The command lines' shared error handling (cowfs and vctx)."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import click

from . import errors


class ErrorsToExitCodes(click.Group):
    """Turns user errors into one line on stderr and a distinct exit code.

    Subclasses name their program and the exception types that carry an
    exit_code of their own.
    """

    prog: ClassVar[str] = "cowfs"
    user_errors: ClassVar[tuple[type[Exception], ...]] = (errors.CowfsError,)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except self.user_errors as e:
            click.echo(f"{self.prog}: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 1))
        except OSError as e:
            click.echo(f"{self.prog}: {errors.os_error_line(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(f"{self.prog}: interrupted", err=True)
            sys.exit(130)
