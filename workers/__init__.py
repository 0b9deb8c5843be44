"""Ray actor pools, the handler registry and the built-in handlers. Imports only `schemas`."""
