"""Process plumbing with no model knowledge: user-facing errors, atomic files, threads, console output, seeds."""
