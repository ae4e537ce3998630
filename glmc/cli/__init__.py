"""The `glmc` command line. Only this package reads the environment and prints."""

from __future__ import annotations

import sys

import click

from glmc import __version__
from glmc.errors import GlmcError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="glmc")
def cli() -> None:
    """glmc runs GLM-130B-class models faithfully and fast.

    \b
    Commands:
      run       fill blanks ([MASK], [sMASK], [gMASK]) and generate text
      export    compile a SAT checkpoint into a package of optimised per-rank graphs
      convert   change the tensor-parallel degree of a SAT checkpoint, optionally quantize
      inspect   validate a checkpoint or a package and describe it
      evaluate  score GLM-130B's YAML tasks (multiple choice, generation, language modelling)
      train     pre-train a GLM with GLM-130B's blank-infilling objective

    Run `glmc COMMAND --help` for each command's options.
    """


def main(argv: list[str] | None = None) -> int:
    """Entry point: every error is one line on stderr; exit 1 for bad input, 2 for bad usage."""
    from glmc.cli import convert, evaluate, export, inspect, run, train  # noqa: F401  (registers the commands)

    try:
        cli.main(args=argv, prog_name="glmc", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("glmc: interrupted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as error:  # bare `glmc`: show the help
        click.echo(error.format_message())
        return 0
    except click.UsageError as error:  # one line, like every other error
        command = f"glmc {error.ctx.info_name} " if error.ctx and error.ctx.parent else "glmc "
        click.echo(f"glmc: error: {error.format_message()} (see '{command}--help')", err=True)
        return error.exit_code
    except click.ClickException as error:
        click.echo(f"glmc: error: {_one_line(error.format_message())}", err=True)
        return error.exit_code
    except GlmcError as error:
        click.echo(f"glmc: error: {_one_line(str(error))}", err=True)
        return 1
    except OSError as error:  # a path the user gave: unwritable, a folder, the disk full...
        where = f"{error.filename}: " if error.filename else ""
        click.echo(f"glmc: error: {where}{error.strerror or error}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("glmc: interrupted", err=True)
        return 130
    except Exception as error:  # a bug of glmc's: one line for the user, the traceback in a log
        log = _write_crash_log()
        click.echo(f"glmc: internal error: {type(error).__name__}: {_one_line(str(error))} "
                   f"(traceback in {log}; please report it)", err=True)
        return 70
    return 0


MESSAGE_LIMIT = 400  # characters of a message quoted from elsewhere (a file's contents, a library)


def _one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_crash_log() -> str:
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="glmc-crash-", suffix=".log", delete=False) as f:
        traceback.print_exc(file=f)
        return f.name


if __name__ == "__main__":
    sys.exit(main())
