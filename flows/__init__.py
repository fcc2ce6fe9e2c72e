"""Prefect flows: composition of the dvc.yaml stages, nothing else."""
