"""The pool's metadata server: index, dispatch, endpoints, the process that runs them."""
