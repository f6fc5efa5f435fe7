"""Failures of a run (kept apart from `dataflow` so callers need not import Ray)."""


class InputError(ValueError):
    """The input cannot be processed as configured; the message names the file and the fix."""


class StageError(RuntimeError):
    """A LoGo actor refused its configuration (a bad model, adapter or option); nothing more runs."""


class InjectedFault(RuntimeError):
    """Raised by the testing hook `fail_after_files`: the run stops as if the driver had died."""


class OutputError(RuntimeError):
    """The output location holds something this run must not touch or cannot complete."""


class TooManyErrors(RuntimeError):
    """Every row is accounted for, but more of them failed than `run.max_error_fraction` allows:
    the run is not committed and its rows are kept (rerun with `--retry-errors` once fixed)."""


def too_many(errors: int, total: int, max_error_fraction: float) -> bool:
    """More error rows than `run.max_error_fraction` allows: the run stops uncommitted (exit 3). The
    one comparison: the run makes it on the rows written, `validate` on the rows it knows will fail."""
    return bool(total) and errors / total > max_error_fraction


def cause_in(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `kinds` in `err`'s chain. Ray wraps what a task or actor raised and
    carries the original only as text through Ray Data's wrapper: then the last line naming one of
    `kinds` gives its message."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    text = str(err)
    for kind in kinds:
        found = [line.split(f"{kind.__name__}: ", 1)[1] for line in text.splitlines()
                 if f"{kind.__name__}: " in line and not line.lstrip().startswith("File ")]
        if found:
            return kind(found[-1].strip())
    return None
