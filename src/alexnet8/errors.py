"""The errors a user can cause and fix: bad params, bad data. Reads and writes nothing.

Stages raise these with a message naming the key or the file and the problem; `cli.run` prints
the message without a traceback and exits with status 1.
"""


class PipelineError(ValueError):
    """A problem with the pipeline's inputs that the user can fix."""


class ParamsError(PipelineError):
    """params.yaml has an unknown, missing or invalid key."""


class DataError(PipelineError):
    """A downloaded or prepared file is missing, corrupt or not what was expected."""


def validation_problems(error) -> str:
    """A pydantic ValidationError's problems on one line: `key.path: message; ...`."""
    return "; ".join(f"{'.'.join(map(str, item['loc'])) or 'file'}: {item['msg']}" for item in error.errors())
