"""Entry points run as Ray jobs: `ray job submit --working-dir . -- python -m onegen.jobs.<name>`."""
