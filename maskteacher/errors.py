"""The one exception type for bad user input.

Raise :class:`UserError` with a single line that names what is wrong (file, key, value) and
what was expected. The CLI prints it as one line and exits with code 2; nothing else in the
package catches it. ``maskteacher.cache_format`` has its own ``CacheError`` (it imports nothing
from the package) which the CLI treats the same way.
"""


class UserError(Exception):
    """Bad input from the user: a file, a config key or value, a checkpoint, a dataset."""
