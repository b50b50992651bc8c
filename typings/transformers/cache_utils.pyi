# See __init__.pyi: the cache classes factfind extends or builds, typed as Any.
from typing import Any

def __getattr__(name: str) -> Any: ...
