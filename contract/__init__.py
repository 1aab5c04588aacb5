"""The shared contract: every name that more than one component must spell the same way."""
