"""The `glmc` command line. Only this package reads the environment and prints."""

from __future__ import annotations

import os
import signal
import sys
import threading

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
      serve     an OpenAI-compatible HTTP server with continuous batching

    Run `glmc COMMAND --help` for each command's options.
    """


def main(argv: list[str] | None = None) -> int:
    """Entry point: every error is one line on stderr; exit 1 for bad input, 2 for bad usage."""
    from glmc.cli import convert, evaluate, export, inspect, run, serve, train  # noqa: F401  (registers the commands)

    watchdog = InterruptWatchdog.arm()
    try:
        return _main(argv, watchdog)
    finally:
        watchdog.disarm()


def _main(argv: list[str] | None, watchdog) -> int:
    try:
        cli.main(args=argv, prog_name="glmc", standalone_mode=False)
    except click.exceptions.Abort:
        watchdog.reported()
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
        watchdog.reported()
        click.echo("glmc: interrupted", err=True)
        return 130
    except Exception as error:  # a bug of glmc's: one line for the user, the traceback in a log
        log = _write_crash_log()
        click.echo(f"glmc: internal error: {type(error).__name__}: {_one_line(str(error))} "
                   f"(traceback in {log}; please report it)", err=True)
        return 70
    return 0


class InterruptWatchdog:
    """Ctrl-C ends glmc within a second whatever it is doing.

    Python raises KeyboardInterrupt only between bytecodes of the main thread: inside a long
    C++ call (ONNX Runtime building a session over gigabytes of weights, a large prefill,
    a collective) it waits for the call to return. The signal still wakes this thread at
    once (through `signal.set_wakeup_fd`); if glmc has not finished `INTERRUPT_GRACE`
    seconds later, the thread reports the interrupt and ends the process. Worker ranks die
    with it (they hold PR_SET_PDEATHSIG), and half-written outputs are temporary paths
    that later runs remove.
    """

    def __init__(self, read_fd: int, write_fd: int):
        self._read_fd, self._write_fd = read_fd, write_fd
        self._reported = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="glmc-interrupt-watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def arm(cls) -> "InterruptWatchdog | _Disarmed":
        """Watch for Ctrl-C, unless this is not the main thread or the process already has a wakeup
        fd (an event loop, or glmc's own main() called from inside another glmc call)."""
        if threading.current_thread() is not threading.main_thread():
            return _Disarmed()
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if previous != -1:
            signal.set_wakeup_fd(previous)  # someone else's: leave it to them
            os.close(read_fd)
            os.close(write_fd)
            return _Disarmed()
        return cls(read_fd, write_fd)

    def reported(self) -> None:
        """The main thread has told the user: the watchdog stays quiet."""
        self._reported.set()

    def disarm(self) -> None:
        """glmc is done: give the wakeup fd back and end the thread (it reads end of file, or
        wakes from its grace period). After an interrupt the thread stays: the process's own
        shutdown (joining workers, atexit hooks) gets the same grace, then it ends."""
        signal.set_wakeup_fd(-1)
        if self._reported.is_set():  # the interrupt's byte is in the pipe: the thread is or will be waiting
            return
        self._done.set()
        os.close(self._write_fd)
        self._thread.join()
        os.close(self._read_fd)

    def _watch(self) -> None:
        while True:
            data = os.read(self._read_fd, 64)
            if not data:
                return
            if signal.SIGINT in data:
                if self._done.wait(INTERRUPT_GRACE):
                    return  # glmc ended by itself in time
                if not self._reported.is_set():
                    sys.stderr.write("glmc: interrupted\n")
                    sys.stderr.flush()
                os._exit(130)


class _Disarmed:
    def reported(self) -> None:
        pass

    def disarm(self) -> None:
        pass


INTERRUPT_GRACE = 1.0  # seconds the main thread has to end by itself after Ctrl-C

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
