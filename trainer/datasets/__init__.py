"""Getting the example datasets (download or local copies, checksums, layouts). Torch-free and
apart from the training code: scripts/get_data.py runs it before the heavy install."""
