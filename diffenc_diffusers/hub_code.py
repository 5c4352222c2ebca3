"""The code file saved with every DiffEnc pipeline, so that diffusers' generic loader can load it.

`DiffEncPipeline.save_pretrained` and every upload copy this file, unchanged, as `diffenc_pipeline.py` into the
pipeline folder and into each component's folder, and model_index.json names it (`["diffenc_pipeline",
"DiffEncPipeline"]`, `["diffenc_pipeline", "VDMUNetModel"]`, ...). Then

    DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)

finds the classes here. This file holds no model code: it imports them from the installed diffenc-diffusers
package, so the weights are always run by the installed, reviewed package and never by code from a repository.
`DiffEncPipeline.from_pretrained` never runs this file; it reads these entries as the package's own classes.
"""

try:
    import diffenc_diffusers
except ImportError as error:
    raise ImportError(
        "This is a DiffEnc pipeline: loading it needs the diffenc-diffusers package, which is not installed "
        "(it is not on PyPI). Install it from its source repository (pip install -e . in a checkout of "
        "diffenc-diffusers), then load the pipeline again."
    ) from error

# Every public class of the installed package (the pipeline, its models and schedulers), under its own name.
__all__ = list(diffenc_diffusers.__all__)
globals().update({name: getattr(diffenc_diffusers, name) for name in __all__})
