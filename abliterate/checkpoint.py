"""The apply stage's former module name: `abliterate.checkpoint` is `abliterate.apply`, the very same module object.

Kept so that code written against the old name (scripts, benchmarks run on older revisions) keeps working, patches of
its functions included.
"""

import sys

from abliterate import apply as _apply

sys.modules[__name__] = _apply
