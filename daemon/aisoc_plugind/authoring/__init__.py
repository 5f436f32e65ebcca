"""Help plugin authors: validate, keys, sign and verify, package, scaffold from templates.

Imports `engine` (the same reader and trust decision as the daemon), `delivery` (the
package format) and below.
"""

__all__: list[str] = []
