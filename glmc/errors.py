"""User-facing errors: the CLI prints them as one line, without a traceback."""


class GlmcError(Exception):
    """A problem with the user's input (a file, an option, a prompt), not a bug."""


class CheckpointError(GlmcError):
    """A checkpoint that cannot be read, or does not fit its configuration."""


class PromptError(GlmcError):
    """A prompt that cannot be generated from (too long, no room to generate)."""
