"""DiffEncPipeline: sampling, likelihood in bits/dim and Hub I/O for VDM and DiffEnc models."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import CommitInfo
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .data import IMAGE_KEYS, INTEGER_DTYPES, LABEL_KEYS, likelihood_batches  # noqa: F401 (names kept here)
from .discretization import grid_to_uint8
from .hub import (
    download_pipeline,
    package_model_index,
    upload_pipeline_folder,
    write_hub_layout,
)
from .models import DiffEncEncoderModel, VDMUNetModel
from .models.class_embedding import check_class_labels
from .objective import DiffEncObjective, networks_in_eval_mode
from .pipeline_folder import COMPONENT_CLASSES, REQUIRED_COMPONENTS  # noqa: F401 (public names kept here)
from .pipeline_folder import check_pipeline_folder as _check_pipeline_folder
from .presets import PRESETS_DIR, build_preset_components, preset_names, resolve_preset  # noqa: F401
from .scheduling_utils import VDMSchedulerMixin, check_scheduler

OUTPUT_TYPES = ("pil", "np", "pt")
"""Accepted `output_type` values of :meth:`DiffEncPipeline.__call__`."""


@dataclass
class DiffEncLikelihoodOutput(BaseOutput):
    """Output of :meth:`DiffEncPipeline.bits_per_dim`: per-image terms of the negative ELBO, in bits/dim.

    Every field is a float32 CPU tensor of shape `(num_images,)`, in the order the images were given.

    Args:
        bpd (`torch.Tensor`): The negative ELBO, `loss_recon + loss_klz + loss_diff` (an upper bound on the
            negative log-likelihood of the 8-bit image).
        loss_recon (`torch.Tensor`): Reconstruction term, -log p(x | z_0).
        loss_klz (`torch.Tensor`): Prior term, KL(q(z_1 | x) || N(0, I)).
        loss_diff (`torch.Tensor`): Diffusion term, a one-sample estimate (continuous time or T steps).
    """

    bpd: torch.Tensor
    loss_recon: torch.Tensor
    loss_klz: torch.Tensor
    loss_diff: torch.Tensor


class DiffEncPipeline(DiffusionPipeline):
    r"""
    Image generation (unconditional, or class-conditional with classifier-free guidance) and likelihood evaluation
    with a VDM or DiffEnc model.

    DiffEnc (Nielsen et al., "DiffEnc: Variational Diffusion with a Learned Encoder", ICLR 2024) is a
    Variational Diffusion Model (Kingma et al., 2021) whose forward process runs on an encoding x_phi(x, t) of
    the data. The scheduler's `encoder_type` says which model this is: `"none"` (VDM), `"nontrainable"` or
    `"trainable"` DiffEnc (its forward process, `pipe.scheduler.forward_process`). Only the trainable kind has an
    encoder network; it is needed for the likelihood (:meth:`bits_per_dim`) and never for sampling, so it is an
    optional component.

    This model inherits from [`DiffusionPipeline`]: saving, loading, `.to(...)`, progress-bar configuration
    and CPU offload work as for any diffusers pipeline. :meth:`from_pretrained` also accepts Hub repository
    ids, and :meth:`from_preset` builds an untrained pipeline from a named preset (`diffenc_diffusers/presets/`).

    Parameters:
        unet ([`VDMUNetModel`]): The denoiser, called as `unet(z_t, gamma_t).sample`.
        scheduler ([`VDMScheduler`] or another scheduler of this package, a [`VDMSchedulerMixin`]): The noise
            schedule and sampler; its config says the model kind. Swap samplers with
            `pipe.scheduler = OtherScheduler.from_config(pipe.scheduler.config)`; diffusers' integer-timestep
            schedulers are refused (TypeError) at assignment.
        encoder ([`DiffEncEncoderModel`], *optional*): The encoder network y_phi of a trainable DiffEnc model.
    """

    model_cpu_offload_seq = "unet"
    _optional_components: ClassVar[list[str]] = ["encoder"]

    def __init__(
        self,
        unet: VDMUNetModel,
        scheduler: VDMSchedulerMixin,
        encoder: DiffEncEncoderModel | None = None,
    ):
        super().__init__()
        check_scheduler(scheduler, "DiffEncPipeline's `scheduler`")
        if encoder is not None:
            if not scheduler.forward_process.needs_encoder:
                raise ValueError(
                    f"An `encoder` was given but the scheduler's `encoder_type` is "
                    f"{scheduler.config.encoder_type!r}; only a trainable DiffEnc model (encoder_type='trainable') "
                    "has an encoder network."
                )
            if encoder.config.in_channels != unet.config.in_channels:
                raise ValueError(
                    f"The encoder takes {encoder.config.in_channels} channels but the denoiser takes "
                    f"{unet.config.in_channels}; both must model the same images."
                )
        self.register_modules(unet=unet, scheduler=scheduler, encoder=encoder)

    def __setattr__(self, name: str, value: Any) -> None:
        # `pipe.scheduler = ...` (and `register_modules`) accept only the schedulers of this package: a diffusers
        # DDIMScheduler would fail later, inside sampling, with an AttributeError on `gamma`.
        if name == "scheduler":
            check_scheduler(value, "DiffEncPipeline's `scheduler`")
        super().__setattr__(name, value)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this pipeline models (the denoiser's config)."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return self.unet.config.in_channels, height, width

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        guidance_scale: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Sample images: z_1 ~ N(0, I), `num_inference_steps` reverse steps of the scheduler from t = 1 to t = 0,
        then the decoder's most likely 8-bit value at z_0 (:meth:`VDMSchedulerMixin.decode`). The steps below are
        [`VDMScheduler`]'s (on the even time grid); another scheduler of this package brings its own.

        With gamma = -log SNR, delta = gamma_s - gamma_t < 0 from t to s < t, c = -expm1(delta), the
        denoiser's estimate x_hat of x_phi(x, t), eps_hat = (z_t - alpha_t x_hat) / sigma_t, and
        x_hat_s = x_hat (1 - delta sigma_t^2) for DiffEnc (x_hat_s = x_hat for VDM; the DiffEnc term moves the
        estimate of the encoded data from t to s, and needs no encoder network), each step is

            z_s = alpha_s x_hat_s + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(w c) eps,
            eps ~ N(0, I).

        `eta = 1` is the ancestral sampler of the generative model (w is the scheduler's `variance_weight`).
        `eta = 0` is the deterministic DDIM-style sampler on the log-SNR grid: z_s = alpha_s x_hat_s +
        sigma_s eps_hat, so the image is a deterministic function of z_1. The sampler state is kept in float32
        (float64 for a float64 denoiser) whatever the networks' dtype; gamma is computed in float64.

        Args:
            batch_size (`int`, defaults to 1): Number of images, at least 1.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Makes sampling
                deterministic; a list of `batch_size` generators draws each image's noise from its own
                generator, so a batch equals its images sampled one by one with the same generators.
            num_inference_steps (`int`, defaults to 1000): Number of reverse steps, at least 1.
            output_type (`str`, defaults to `"pil"`): `"pil"` (list of `PIL.Image`), `"np"` (float32 array of
                shape `(batch_size, height, width, channels)`) or `"pt"` (float32 tensor of shape
                `(batch_size, channels, height, width)`). "np" and "pt" hold exactly k / 255 for the 8-bit
                values k.
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.
            eta (`float`, *optional*): 1 for ancestral sampling, 0 for the deterministic sampler; in [0, 1].
                Default: the scheduler's (1.0 for [`VDMScheduler`]). Only for a scheduler whose `step` takes
                `eta` (refused otherwise).
            class_labels (`torch.Tensor` or `list[int]` of length `batch_size`, *optional*): The class of each
                image, for a class-conditional denoiser (`num_class_embeds` set; required there, refused
                otherwise).
            guidance_scale (`float`, defaults to 1.0): Classifier-free guidance: the denoiser's output is
                out(null) + s (out(c) - out(null)) with s = `guidance_scale` and the null class of a denoiser
                with `null_class=True`. 1 is the conditional model itself (one network call per step); other
                values cost two.

        Example:

        ```py
        >>> import torch
        >>> from diffenc_diffusers import DiffEncPipeline

        >>> pipe = DiffEncPipeline.from_pretrained("path/or/org-name")
        >>> images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images
        ```

        Returns:
            [`ImagePipelineOutput`] or `tuple`: The images, or `(images,)` when `return_dict` is False.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if not (
            generator is None
            or isinstance(generator, torch.Generator)
            or (isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator))
        ):
            raise TypeError(
                "`generator` must be a torch.Generator, a list of one torch.Generator per image, or None; got "
                f"{generator!r}. For a seed use torch.Generator().manual_seed(seed)."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but `batch_size` is {batch_size}; pass "
                "one generator per image, or a single generator."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0):
            raise ValueError(f"`eta` must be a float in [0, 1] (1: ancestral, 0: deterministic), got {eta!r}.")
        step_kwargs = self._step_kwargs(generator=generator, eta=eta)

        device = self._execution_device
        labels = self._sampling_labels(class_labels, guidance_scale, batch_size, device)
        latent_dtype = torch.promote_types(self.unet.dtype, torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = randn_tensor((batch_size, *self.image_shape), generator=generator, device=device, dtype=latent_dtype)
        for t in self.progress_bar(self.scheduler.timesteps):
            gamma_t = self.scheduler.gamma(t).to(latent_dtype).expand(batch_size)
            with self._network_autocast(device):
                if guidance_scale == 1.0:
                    model_output = self.unet(sample, gamma_t, **labels).sample.to(latent_dtype)
                else:
                    both = self.unet(torch.cat([sample, sample]), torch.cat([gamma_t, gamma_t]), **labels).sample
                    conditional, unconditional = both.to(latent_dtype).chunk(2)
                    model_output = unconditional + guidance_scale * (conditional - unconditional)
            sample = self.scheduler.step(model_output, t, sample, **step_kwargs).prev_sample

        images = grid_to_uint8(self.scheduler.decode(sample)).to(torch.float32) / 255.0
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _step_kwargs(self, generator: Any, eta: float | None) -> dict[str, Any]:
        """The keyword arguments the scheduler's `step` takes, read from its signature as diffusers' pipelines'
        `prepare_extra_step_kwargs` does: `generator` if it draws noise, `eta` if given (else the scheduler's
        default). A deterministic sampler needs neither; an `eta` it cannot take is refused."""
        accepted = inspect.signature(self.scheduler.step).parameters
        if eta is not None and "eta" not in accepted:
            raise ValueError(
                f"`eta` is {eta}, but the scheduler {type(self.scheduler).__name__}'s `step` takes no `eta`; leave "
                "it unset."
            )
        kwargs = {"generator": generator} if "generator" in accepted else {}
        if eta is not None:
            kwargs["eta"] = eta
        return kwargs

    def _sampling_labels(
        self, class_labels: Any, guidance_scale: float, batch_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The denoiser's ``class_labels`` keyword for sampling ({} for an unconditional denoiser); with guidance
        (scale != 1) the labels followed by as many null labels."""
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"`guidance_scale` must be a float, got {guidance_scale!r}.")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale}.")
        num_classes = self.unet.config.get("num_class_embeds")
        if num_classes is None:
            if class_labels is not None or guidance_scale != 1.0:
                raise ValueError(
                    "`class_labels` and `guidance_scale` need a class-conditional denoiser; this one is "
                    "unconditional (`num_class_embeds=None`)."
                )
            return {}
        if class_labels is None:
            raise ValueError(
                f"This denoiser is class-conditional (`num_class_embeds={num_classes}`): pass `class_labels`, one "
                f"label per image ({batch_size})."
            )
        labels = torch.as_tensor(class_labels, device=device)
        if labels.shape != (batch_size,):
            raise ValueError(
                f"`class_labels` must hold one label per image, shape ({batch_size},); got {tuple(labels.shape)}. "
                "Pass batch_size=len(class_labels)."
            )
        check_class_labels(labels, batch_size, num_classes, self.unet.config.get("null_class", False))
        if guidance_scale != 1.0:
            if not self.unet.config.get("null_class", False):
                raise ValueError(
                    f"`guidance_scale={guidance_scale}` needs a denoiser with a null class (`null_class=True`); "
                    "this one has none. Use guidance_scale=1.0 (the conditional model)."
                )
            labels = torch.cat([labels, torch.full_like(labels, num_classes)])
        return {"class_labels": labels}

    @torch.no_grad()
    def bits_per_dim(
        self,
        images: Any,
        batch_size: int = 64,
        num_timesteps: int | None = None,
        generator: torch.Generator | None = None,
        image_column: str | None = None,
        show_progress: bool = True,
        return_dict: bool = True,
        class_labels: torch.Tensor | None = None,
        label_column: str | None = None,
    ) -> DiffEncLikelihoodOutput | tuple:
        r"""
        Per-image negative ELBO of 8-bit images, in bits per dimension, with each of its three terms.

        The pipeline's components are combined into a [`DiffEncObjective`] and run in eval mode without
        gradients (networks in float16/bfloat16 run under autocast; every term is summed in float32 or
        wider). The diffusion term is a one-sample estimate: average several calls (or many images) for a
        precise dataset figure. Results depend only on the images, the batching and `generator`.

        Args:
            images: One of
                - a `torch.Tensor` of dtype uint8 and shape `(N, C, H, W)` (values 0..255);
                - a `torch.utils.data.DataLoader` yielding such tensors, `(images, labels)` tuples or lists
                  (images first, class labels second), or dicts with the images under `image_column` and the
                  labels under `label_column` (its own batches are used);
                - a `datasets.Dataset` with a column of PIL images (mode "L" for 1 channel, "RGB" for 3) or
                  of uint8 arrays of shape `(C, H, W)`, and for a class-conditional pipeline a column of
                  integer labels (`label_column`).
                C, H and W must equal the denoiser's `in_channels` and `sample_size`: images are never
                resized, converted or cast. A class-conditional pipeline needs a label for every image:
                `class_labels` with a tensor, the labels of the batches or of the dataset otherwise. An
                unconditional pipeline does not read the labels of a DataLoader or dataset, so the same
                labelled data serves both.
            batch_size (`int`, defaults to 64): Images per forward pass for a tensor or a `datasets.Dataset`.
            num_timesteps (`int`, *optional*): T for the discrete-time diffusion loss; `None` (default) for
                continuous time (T = infinity).
            generator (`torch.Generator`, *optional*): Draws the times and noises; the same generator state
                gives the same result.
            image_column (`str`, *optional*): The dict key / dataset column holding the images. By default
                the only image column, or the only column named "image", "img", "images" or "pixel_values".
            show_progress (`bool`, defaults to `True`): Show a progress bar over batches.
            return_dict (`bool`, defaults to `True`): Return a [`DiffEncLikelihoodOutput`] instead of the
                tuple `(bpd, loss_recon, loss_klz, loss_diff)`.
            class_labels (`torch.Tensor` of shape `(N,)` or `list[int]`, *optional*): Integer labels of the images for a
                class-conditional model, 0 .. K - 1 or K (the null class, if the model has one): the result is
                the conditional ELBO -log p(x | c). Only with a uint8 tensor of images (a DataLoader or a
                dataset brings its own labels); required there for a class-conditional model, refused for an
                unconditional one.
            label_column (`str`, *optional*): The dict key of a DataLoader's batches or the `datasets.Dataset`
                column holding the integer class labels. By default the only `datasets.ClassLabel` column, else
                the only key or column named "label", "labels" or "class_labels". Not for a tensor or for
                tuple batches (whose second element is the labels). Checked when given; its values are read
                only by a class-conditional pipeline.

        Returns:
            [`DiffEncLikelihoodOutput`] or `tuple`: per-image float32 CPU tensors of shape `(N,)`, in
            bits/dim.

        Raises:
            ValueError: A trainable DiffEnc pipeline without its encoder; images of the wrong shape; bad
                arguments.
            TypeError: Images that are not uint8, or an input of an unsupported type.
        """
        if self.scheduler.forward_process.needs_encoder and self.encoder is None:
            raise ValueError(
                "This pipeline models a trainable DiffEnc (scheduler encoder_type='trainable') but has no "
                "`encoder` component, so it can sample but cannot compute a likelihood: the ELBO of a "
                "trainable DiffEnc model needs its encoder network. Load the pipeline with its encoder/ "
                "folder, or pass `encoder=` to `from_pretrained`."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a single torch.Generator or None, got {type(generator).__name__}.")
        objective = DiffEncObjective(self.unet, self.scheduler, encoder=self.encoder, num_timesteps=num_timesteps)
        batches = likelihood_batches(
            images, batch_size, self.image_shape, objective.num_classes, objective.null_label is not None,
            class_labels=class_labels, image_column=image_column, label_column=label_column,
        )  # fmt: skip

        device = self._execution_device
        autocast = self._network_autocast(device)
        terms: dict[str, list[torch.Tensor]] = {"bpd": [], "loss_recon": [], "loss_klz": [], "loss_diff": []}
        with networks_in_eval_mode(objective):
            for batch, labels in self.progress_bar(batches) if show_progress else batches:
                labels = None if labels is None else labels.to(device)
                with autocast:
                    output = objective(batch.to(device), generator=generator, class_labels=labels)
                for name, values in terms.items():
                    values.append(getattr(output, name).detach().to("cpu", torch.float32))

        self.maybe_free_model_hooks()
        if not terms["bpd"]:
            raise ValueError("`images` holds no images.")
        result = DiffEncLikelihoodOutput(**{name: torch.cat(values) for name, values in terms.items()})
        if not return_dict:
            return result.to_tuple()
        return result

    def _network_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast to the networks' float16/bfloat16 (a no-op for float32/float64 networks).

        Inputs stay float32: the denoiser's Fourier features (frequencies up to 2^7 2 pi) and its `+ z` skip are
        then computed in float32, which casting z_t to bfloat16 first would ruin.
        """
        if self.unet.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device.type, dtype=self.unet.dtype)
        return contextlib.nullcontext()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiffEncPipeline:
        r"""
        Load a saved pipeline from a local folder or a Hugging Face Hub repository.

        A Hub id (`"org/name"`) is fetched with `huggingface_hub.snapshot_download` (only model_index.json,
        the component configs, the safetensors weights and the model card) and the snapshot folder is then
        loaded like a local one. Before loading, the folder is checked: every component listed in
        model_index.json must have its folder, config and readable safetensors weights (nothing is ever
        unpickled).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): A folder written by `save_pretrained`, or
                a Hub repository id.
            revision (`str`, *optional*): Branch, tag or commit of a Hub repository (default "main").
            cache_dir (`str` or `os.PathLike`, *optional*): Hugging Face cache folder.
            token (`str` or `bool`, *optional*): Hub token for private repositories.
            local_files_only (`bool`, defaults to `False`): Use only the local cache (as `HF_HUB_OFFLINE=1`
                does).
            force_download (`bool`, defaults to `False`): Download again even if cached.
            kwargs: Passed to [`DiffusionPipeline.from_pretrained`], e.g. `dtype=torch.bfloat16`, or a
                component to use instead of the saved one (`encoder=...`).

        Raises:
            FileNotFoundError: The argument is neither a folder nor a repository id; a listed component's
                folder, config or weights are missing.
            OSError: A weights file is truncated or corrupted; a Hub repository is not cached while offline.
        """
        name = os.fspath(pretrained_model_name_or_path)
        download_options = {
            key: kwargs.pop(key)
            for key in ("revision", "cache_dir", "token", "local_files_only", "force_download")
            if key in kwargs
        }
        if kwargs.get("use_safetensors") is False:
            raise ValueError("DiffEncPipeline loads safetensors weights only; `use_safetensors=False` is not accepted.")
        if os.path.isdir(name):
            folder = name
        else:
            try:
                validate_repo_id(name)
            except HFValidationError as error:
                raise FileNotFoundError(
                    f"{name!r} is neither an existing pipeline folder nor a Hub repository id ('org/name')."
                ) from error
            folder = download_pipeline(name, **download_options)
        _check_pipeline_folder(folder, passed=set(kwargs) & set(COMPONENT_CLASSES))
        pipeline = super().from_pretrained(folder, use_safetensors=True, **kwargs)
        pipeline.register_to_config(_name_or_path=name)
        return pipeline

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> Any:
        r"""
        Read model_index.json as :meth:`from_pretrained` loads it: the entries naming the code file saved with
        the pipeline (`["diffenc_pipeline", ...]`, for diffusers' generic loader) are read as this package's own
        classes, so that loading never runs code from the folder. Arguments and return value as
        [`ConfigMixin.load_config`].
        """
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        converted = package_model_index(config)
        config.clear()
        config.update(converted)
        return loaded

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Save the pipeline to a folder: model_index.json, and per component its config and safetensors weights.
        The JSON files hold no local path (diffusers' `_name_or_path` entry is left out). The folder also gets
        `diffenc_pipeline.py` (at its root and in each component's folder; it only imports this package's
        classes), named in model_index.json, so that diffusers' generic
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it too.

        Args:
            save_directory (`str` or `os.PathLike`): The folder (created if needed).
            safe_serialization (`bool`, defaults to `True`): Must be True (weights are saved as safetensors
                only).
            variant (`str`, *optional*): Weights file variant, e.g. "fp16".
            max_shard_size (`int` or `str`, *optional*): Shard the weights above this size.
            push_to_hub (`bool`, defaults to `False`): Also upload exactly the files `from_pretrained` loads
                (those of `variant`) with a model card, as :meth:`push_to_hub` does; nothing else in the folder.
                `kwargs` then takes `repo_id` (default: the folder's name), `commit_message`, `private`,
                `token`, `create_pr`, `training_info` and `bpd`.
        """
        if not safe_serialization:
            raise ValueError("DiffEncPipeline saves weights as safetensors only; `safe_serialization` must be True.")
        super().save_pretrained(save_directory, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
        write_hub_layout(save_directory, variant)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", Path(save_directory).resolve().name)
            upload_pipeline_folder(self, save_directory, repo_id, variant=variant, **kwargs)
        elif kwargs:
            raise TypeError(f"Unexpected keyword arguments without `push_to_hub=True`: {sorted(kwargs)}.")

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        variant: str | None = None,
        training_info: Mapping[str, Any] | None = None,
        bpd: float | None = None,
    ) -> CommitInfo:
        r"""
        Upload the pipeline to a Hub model repository (created if needed) with a model card.

        The pipeline is saved into a temporary folder and exactly its files are uploaded in one commit:
        model_index.json, each component's config and safetensors weights (of `variant`), and README.md (no
        file holds a local path of this machine; see `diffenc_diffusers.hub.upload_pipeline_folder`), a
        model card with
        `library_name: diffusers`, the tags diffenc, vdm, diffusion, likelihood and
        unconditional-image-generation, a description of the model, its negative ELBO when `bpd` is given,
        the training settings in `training_info` and a usage snippet.

        Args:
            repo_id (`str`): "org/name" or "name" (in your namespace).
            commit_message (`str`, *optional*): Commit message.
            private (`bool`, *optional*): Create the repository as private.
            token (`str` or `bool`, *optional*): Hub token with write access.
            create_pr (`bool`, defaults to `False`): Open a pull request instead of committing to main.
            variant (`str`, *optional*): Weights file variant, e.g. "fp16".
            training_info (`Mapping`, *optional*): How the model was trained (e.g. the training_config.json of
                its preset, steps, hardware); each entry becomes a row of the card's training table.
            bpd (`float`, *optional*): Test-set negative ELBO in bits/dim, if known.

        Returns:
            huggingface_hub's `CommitInfo` of the upload.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, variant=variant)
            return upload_pipeline_folder(
                self,
                folder,
                repo_id,
                variant=variant,
                commit_message=commit_message,
                private=private,
                token=token,
                create_pr=create_pr,
                training_info=training_info,
                bpd=bpd,
            )

    @classmethod
    def from_preset(cls, name_or_path: str | os.PathLike) -> DiffEncPipeline:
        r"""
        Build an untrained pipeline (freshly initialised networks, no weights read) from a preset.

        A preset is a pipeline folder without weights: model_index.json, each component's config, and the
        training settings in training_config.json. Each component is built with
        `Class.from_config(Class.load_config(folder / component))`; seed torch (`torch.manual_seed`) first for
        reproducible initial weights.

        Args:
            name_or_path (`str` or `os.PathLike`): A preset folder, or the name of a preset shipped with the
                package in `diffenc_diffusers/presets/` (e.g. `"digits-vdm"` or `"cifar10-diffenc-32-4"`).

        Example:

        ```py
        >>> from diffenc_diffusers import DiffEncPipeline

        >>> pipe = DiffEncPipeline.from_preset("digits-diffenc-trainable")
        ```
        """
        folder, components = build_preset_components(name_or_path)
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=str(folder))
        return pipeline
