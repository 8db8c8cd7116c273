from concurrent.futures import CancelledError as CancelledError
from concurrent.futures import TimeoutError as TimeoutError
from typing import Any, Callable, Generic, Iterable, Iterator, List, NamedTuple, Optional, TypeVar

from balsam.launcher.dag import BalsamJob

ANY_COMPLETED: str
ALL_COMPLETED: str
MIN_INTERVAL: float
MAX_INTERVAL: float
BACKOFF: float

_R = TypeVar("_R")

class FutureTask(Generic[_R]):
    job: BalsamJob
    def __init__(
        self,
        job: BalsamJob,
        done_callback: Callable[[BalsamJob], _R],
        fail_callback: Optional[Callable[[BalsamJob], _R]] = ...,
    ) -> None: ...
    def done(self) -> bool: ...
    def failed(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def active(self) -> bool: ...
    @property
    def state(self) -> str: ...
    def result(self, timeout: Optional[float] = ...) -> _R: ...

class WaitResult(NamedTuple):
    active: List[FutureTask[Any]]
    done: List[FutureTask[Any]]
    failed: List[FutureTask[Any]]
    cancelled: List[FutureTask[Any]]

def wait(
    futures: Iterable[FutureTask[Any]], timeout: Optional[float] = ..., return_when: str = ...
) -> WaitResult: ...
def as_completed(
    futures: Iterable[FutureTask[_R]], timeout: Optional[float] = ...
) -> Iterator[FutureTask[_R]]: ...
