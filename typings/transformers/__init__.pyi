# A stub that stands in for transformers when pyright checks factfind. transformers' own
# __init__ imports every model under TYPE_CHECKING, so checking against the real package
# made pyright read thousands of modules (> 15 min on the 2-core CI machine); factfind uses a
# handful of classes from it, typed as Any here.
from typing import Any

def __getattr__(name: str) -> Any: ...
