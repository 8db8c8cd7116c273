from typing import Optional, Union
from os import PathLike

from balsam.exceptions import BalsamError as BalsamError
from balsam.exceptions import CycleError as CycleError
from balsam.exceptions import DatabaseError as DatabaseError
from balsam.exceptions import DatabaseUnavailable as DatabaseUnavailable
from balsam.exceptions import DoesNotExist as DoesNotExist
from balsam.exceptions import FieldError as FieldError
from balsam.exceptions import InvalidStateError as InvalidStateError
from balsam.exceptions import JobFailed as JobFailed
from balsam.exceptions import RefusedError as RefusedError

__version__: str

def create_database(path: Union[str, "PathLike[str]"], db_url: Optional[str] = ...) -> str: ...
