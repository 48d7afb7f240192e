"""The tamp-fx command line."""
