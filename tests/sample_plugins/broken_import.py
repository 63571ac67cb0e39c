import kvbridge_native_library_that_does_not_exist  # noqa: F401
