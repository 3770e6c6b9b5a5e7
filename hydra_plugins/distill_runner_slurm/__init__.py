"""Hydra plugin: ``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml). Hydra loads plugins only from this
namespace."""
