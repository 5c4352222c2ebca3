"""DiffEncPipeline: sampling, likelihood in bits/dim, presets and Hub I/O for VDM and DiffEnc models."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import CommitInfo
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from safetensors import SafetensorError, safe_open

from .data import check_image_shape, image_to_uint8
from .discretization import grid_to_uint8
from .hub import (
    CONFIG_NAMES,
    WEIGHTS_PREFIX,
    download_pipeline,
    read_model_index,
    saved_components,
    upload_pipeline_folder,
)
from .models import DiffEncEncoderModel, VDMUNetModel
from .models.class_embedding import check_class_labels
from .objective import DiffEncObjective, networks_in_eval_mode
from .scheduling_utils import VDMSchedulerMixin, check_scheduler
from .scheduling_vdm import VDMScheduler

OUTPUT_TYPES = ("pil", "np", "pt")
"""Accepted `output_type` values of :meth:`DiffEncPipeline.__call__`."""

PRESETS_DIR = Path(__file__).resolve().parent.parent / "pipelines"
"""The repository's preset folder (present in a checkout or an editable install, not in a wheel)."""

COMPONENT_CLASSES: dict[str, type] = {
    "unet": VDMUNetModel,
    "scheduler": VDMScheduler,
    "encoder": DiffEncEncoderModel,
}
"""The class of each pipeline component, as recorded in a preset's model_index.json."""

REQUIRED_COMPONENTS = ("unet", "scheduler")

IMAGE_KEYS = ("image", "img", "images", "pixel_values")
"""Dict keys / dataset columns taken to hold the images when `image_column` is not given."""

LABEL_KEYS = ("label", "labels", "class_labels")
"""Dict keys of a DataLoader's batches taken to hold the class labels when `label_column` is not given."""

INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
"""datasets value dtypes accepted for a column of class labels (a `datasets.ClassLabel` is int64)."""


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
    ids, and :meth:`from_preset` builds an untrained pipeline from a preset of the repository's `pipelines/`.

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
            class_labels (`torch.Tensor` of shape `(N,)`, *optional*): Integer labels of the images for a
                class-conditional model, 0 .. K - 1 or K (the null class, if the model has one): the result is
                the conditional ELBO -log p(x | c). Only with a uint8 tensor of images (a DataLoader or a
                dataset brings its own labels); required there for a class-conditional model, refused for an
                unconditional one.
            label_column (`str`, *optional*): The dict key of a DataLoader's batches or the `datasets.Dataset`
                column holding the integer class labels. By default the only key named "label", "labels" or
                "class_labels", and the only `datasets.ClassLabel` column of a dataset. Not for a tensor or for
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
        classes = _Classes(objective.num_classes, objective.null_label)
        if class_labels is not None:
            if classes.num_classes is None:
                raise ValueError("`class_labels` were given, but this pipeline's models are unconditional.")
            if not isinstance(images, torch.Tensor):
                raise TypeError(
                    "`class_labels` go with the images as a uint8 tensor (N, C, H, W); a DataLoader or a "
                    "datasets.Dataset brings its own labels (the second element of its (images, labels) batches, "
                    f"or the dict key / dataset column `label_column`). Got images of type {type(images).__name__}."
                )
        batches = _likelihood_batches(
            images, batch_size, image_column, label_column, self.image_shape, classes, class_labels
        )

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

        Args:
            save_directory (`str` or `os.PathLike`): The folder (created if needed).
            safe_serialization (`bool`, defaults to `True`): Must be True (weights are saved as safetensors
                only).
            variant (`str`, *optional*): Weights file variant, e.g. "fp16".
            max_shard_size (`int` or `str`, *optional*): Shard the weights above this size.
            push_to_hub (`bool`, defaults to `False`): Also upload the pipeline files (only those) with a
                model card, as :meth:`push_to_hub` does. `kwargs` then takes `repo_id` (default: the
                folder's name), `commit_message`, `private`, `token`, `create_pr`, `training_info` and `bpd`.
        """
        if not safe_serialization:
            raise ValueError("DiffEncPipeline saves weights as safetensors only; `safe_serialization` must be True.")
        super().save_pretrained(save_directory, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", Path(save_directory).resolve().name)
            upload_pipeline_folder(self, save_directory, repo_id, **kwargs)
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

        The pipeline is saved into a temporary folder and exactly its files are uploaded: model_index.json,
        each component's config and safetensors weights, and README.md, a model card with
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
            name_or_path (`str` or `os.PathLike`): A preset folder, or the name of one of the repository's
                presets (a folder of `pipelines/`, e.g. `"digits-vdm"` or `"cifar10-diffenc-32-4"`).

        Example:

        ```py
        >>> from diffenc_diffusers import DiffEncPipeline

        >>> pipe = DiffEncPipeline.from_preset("digits-diffenc-trainable")
        ```
        """
        folder = resolve_preset(name_or_path)
        model_index = read_model_index(folder)
        components = {}
        for name in saved_components(model_index):
            component_class = COMPONENT_CLASSES.get(name)
            if component_class is None:
                raise ValueError(
                    f"The preset {str(folder)!r} lists a component {name!r}; DiffEncPipeline's components "
                    f"are {list(COMPONENT_CLASSES)}."
                )
            if model_index[name][1] != component_class.__name__:
                raise ValueError(
                    f"The preset {str(folder)!r} records {name!r} as {model_index[name][1]!r}; expected "
                    f"{component_class.__name__!r}."
                )
            component_folder = folder / name
            if not component_folder.is_dir():
                raise FileNotFoundError(
                    f"The preset {str(folder)!r} lists the component {name!r} but has no {name}/ folder."
                )
            components[name] = component_class.from_config(component_class.load_config(component_folder))
        _check_required(components, folder)
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=str(folder))
        return pipeline


def preset_names() -> list[str]:
    """Names of the presets in the repository's `pipelines/` folder (empty when it is not available)."""
    if not PRESETS_DIR.is_dir():
        return []
    return sorted(path.name for path in PRESETS_DIR.iterdir() if (path / "model_index.json").is_file())


def resolve_preset(name_or_path: str | os.PathLike) -> Path:
    """The folder of a preset given by path or by name (a folder of the repository's `pipelines/`).

    Raises:
        FileNotFoundError: Neither a folder nor a known preset name; the message lists the available presets.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    candidate = PRESETS_DIR / name
    if "/" not in name and os.sep not in name and (candidate / "model_index.json").is_file():
        return candidate
    if not PRESETS_DIR.is_dir():
        raise FileNotFoundError(
            f"{name!r} is not a preset folder, and the named presets are not available: they live in the "
            f"repository's pipelines/ folder ({PRESETS_DIR} does not exist in this installation). Pass the "
            "path of a preset folder, or install diffenc-diffusers from a checkout (pip install -e .)."
        )
    raise FileNotFoundError(
        f"{name!r} is neither a preset folder nor a preset name; available presets: {preset_names()}."
    )


def _check_required(components: Mapping[str, Any], folder: str | os.PathLike) -> None:
    for name in REQUIRED_COMPONENTS:
        if name not in components:
            raise ValueError(f"{os.fspath(folder)!r}: model_index.json does not list the required component {name!r}.")


def _check_pipeline_folder(folder: str | os.PathLike, passed: set[str]) -> None:
    """Check that every component of a saved pipeline (except those passed in) is complete and readable."""
    root = Path(folder)
    listed = saved_components(read_model_index(root))
    _check_required(dict.fromkeys(listed + sorted(passed)), root)
    for name in listed:
        if name in passed:
            continue
        component_folder = root / name
        if not component_folder.is_dir():
            raise FileNotFoundError(
                f"The pipeline folder {str(root)!r} is missing the component {name!r}: model_index.json "
                f"lists it, but there is no {name}/ folder. Copy the complete folder, or pass `{name}=` to "
                "from_pretrained."
            )
        if not any((component_folder / config_name).is_file() for config_name in CONFIG_NAMES):
            raise FileNotFoundError(
                f"The component {name!r} of {str(root)!r} has no config file ({' or '.join(CONFIG_NAMES)})."
            )
        component_class = COMPONENT_CLASSES.get(name)
        if component_class is None or not issubclass(component_class, ModelMixin):
            continue
        weights = sorted(component_folder.glob(f"{WEIGHTS_PREFIX}*.safetensors"))
        if not weights:
            pickled = sorted(path.name for path in component_folder.glob(f"{WEIGHTS_PREFIX}*.bin"))
            hint = f" It holds {pickled}, which are pickle files and are never loaded." if pickled else ""
            raise FileNotFoundError(
                f"The component {name!r} of {str(root)!r} has no safetensors weights "
                f"({WEIGHTS_PREFIX}.safetensors).{hint}"
            )
        for path in weights:
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError as error:
                raise OSError(
                    f"The weights file {path} of component {name!r} is truncated or corrupted ({error}); "
                    "save or download the pipeline again."
                ) from error


# --------------------------------------------------------------------------------------------- image inputs


_Batch = tuple[torch.Tensor, torch.Tensor | None]
"""One batch of the likelihood: uint8 images (B, C, H, W) and their int64 labels (B,), or None (unconditional)."""


@dataclass(frozen=True)
class _Classes:
    """The classes of the networks: K (None for an unconditional model) and the null label K (or None)."""

    num_classes: int | None
    null_label: int | None


class _SizedBatches:
    """An iterable of batches with a known length (so that progress bars show a total)."""

    def __init__(self, batches: Iterable[_Batch], length: int):
        self._batches = batches
        self._length = length

    def __iter__(self) -> Iterator[_Batch]:
        return iter(self._batches)

    def __len__(self) -> int:
        return self._length


def _likelihood_batches(
    images: Any,
    batch_size: int,
    image_column: str | None,
    label_column: str | None,
    shape: tuple[int, int, int],
    classes: _Classes,
    class_labels: torch.Tensor | None,
) -> Iterable[_Batch]:
    """Checked (images, labels) batches from a tensor (with `class_labels`), a DataLoader or a datasets.Dataset;
    the labels are None for an unconditional model (whatever the data holds)."""
    conditional = classes.num_classes is not None
    if isinstance(images, torch.Tensor):
        if label_column is not None:
            raise ValueError(
                f"`label_column` ({label_column!r}) names a dict key of a DataLoader's batches or a column of a "
                "datasets.Dataset; with the images as a tensor pass their labels as `class_labels`."
            )
        images = _check_batch(images, shape, "`images`")
        labels = None
        if conditional:
            if class_labels is None:
                raise ValueError("This pipeline is class-conditional: pass `class_labels`, one label per image.")
            labels = _check_labels(class_labels, images.shape[0], classes, "`class_labels`")
        starts = range(0, images.shape[0], batch_size)
        batches = (
            (images[start : start + batch_size], None if labels is None else labels[start : start + batch_size])
            for start in starts
        )
        return _SizedBatches(batches, len(starts))
    if isinstance(images, torch.utils.data.DataLoader):
        batches = (
            _loader_batch(item, index, image_column, label_column, shape, classes) for index, item in enumerate(images)
        )
        try:
            return _SizedBatches(batches, len(images))
        except TypeError:
            return batches
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(images, datasets.Dataset):
        return _dataset_batches(images, batch_size, image_column, label_column, shape, classes)
    raise TypeError(
        "`images` must be a uint8 torch.Tensor of shape (N, C, H, W), a torch.utils.data.DataLoader of such "
        f"batches, or a datasets.Dataset; got {type(images).__name__}."
    )


def _loader_batch(
    item: Any,
    index: int,
    image_column: str | None,
    label_column: str | None,
    shape: tuple[int, int, int],
    classes: _Classes,
) -> _Batch:
    what = f"batch {index} of the DataLoader"
    images = _check_batch(_batch_images(item, image_column), shape, what)
    conditional = classes.num_classes is not None
    labels = _batch_labels(item, label_column, what, required=conditional)
    if not conditional:
        return images, None
    return images, _check_labels(labels, images.shape[0], classes, f"the labels of {what}")


def _check_labels(labels: Any, count: int, classes: _Classes, what: str) -> torch.Tensor:
    """`labels` as int64 (count,) if they are an integer tensor of that shape holding labels of the model's
    classes (0 .. K - 1, or K for a model with a null class); a ``TypeError``/``ValueError`` naming them otherwise."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{what} must be an integer torch.Tensor of shape ({count},), got {type(labels).__name__}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be integer class labels, got a tensor of dtype {labels.dtype}.")
    if labels.shape != (count,):
        raise ValueError(
            f"{what} must be a tensor of shape ({count},), one label per image; got {tuple(labels.shape)}."
        )
    num_classes = classes.num_classes
    limit = num_classes if classes.null_label is None else num_classes + 1
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= limit):
        null = "" if classes.null_label is None else f", or {classes.null_label} (the null class)"
        raise ValueError(
            f"{what} must hold labels 0 .. {num_classes - 1}{null} (the model's num_class_embeds={num_classes}); "
            f"got values in [{int(labels.min())}, {int(labels.max())}]."
        )
    return labels.long()


def _check_batch(batch: Any, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{what} must be a uint8 torch.Tensor of shape (N, C, H, W), got {type(batch).__name__}.")
    if batch.dtype != torch.uint8:
        raise TypeError(
            f"{what} must have dtype torch.uint8 (8-bit values 0..255), got {batch.dtype}. (For torchvision "
            "datasets use transforms.PILToTensor(), not ToTensor(), which rescales to floats.)"
        )
    if batch.ndim != 4 or tuple(batch.shape[1:]) != shape:
        raise ValueError(
            f"{what} has shape {tuple(batch.shape)}; this model takes uint8 images of shape (N, {shape[0]}, "
            f"{shape[1]}, {shape[2]}) (the denoiser's in_channels and sample_size); images are never resized."
        )
    return batch


def _pick_column(names: list[str], preferred: list[str], image_column: str | None, what: str) -> str:
    if image_column is not None:
        if image_column not in names:
            raise ValueError(f"`image_column` {image_column!r} is not among the {what}: {names}.")
        return image_column
    candidates = preferred or [name for name in names if name in IMAGE_KEYS] or (names if len(names) == 1 else [])
    if len(candidates) != 1:
        raise ValueError(f"Cannot tell which of the {what} {names} holds the images; pass `image_column`.")
    return candidates[0]


def _batch_images(item: Any, image_column: str | None) -> Any:
    """The images of one DataLoader batch: the batch itself, its first element, or a dict entry."""
    if isinstance(item, Mapping):
        return item[_pick_column(list(item), [], image_column, "keys of the DataLoader's dicts")]
    if isinstance(item, (list, tuple)) and item:
        return item[0]
    return item


def _batch_labels(item: Any, label_column: str | None, what: str, required: bool) -> Any:
    """The labels of one DataLoader batch: the second element of a tuple or list, or a dict entry (the key
    `label_column`, else the only key of :data:`LABEL_KEYS`); None when there are none and none are required."""
    if isinstance(item, Mapping):
        keys = list(item)
        if label_column is not None:
            if label_column not in item:
                raise ValueError(f"`label_column` {label_column!r} is not among the keys of {what}: {keys}.")
            return item[label_column]
        found = [key for key in keys if key in LABEL_KEYS]
        if len(found) == 1:
            return item[found[0]]
        if required:
            raise ValueError(
                f"This pipeline is class-conditional, and {what} is a dict with the keys {keys}: "
                f"{'several' if found else 'none'} of them named {list(LABEL_KEYS)}, so it cannot tell which "
                "holds the class labels; pass `label_column`."
            )
        return None
    if label_column is not None:
        raise ValueError(
            f"`label_column` ({label_column!r}) names a key of dict batches, but {what} is a "
            f"{type(item).__name__}; (images, labels) tuples and lists carry the labels as their second element."
        )
    if isinstance(item, (list, tuple)) and len(item) >= 2:
        return item[1]
    if required:
        raise ValueError(
            f"This pipeline is class-conditional, but {what} holds no class labels: the DataLoader must yield "
            f"(images, labels) tuples or lists, or dicts with the labels under `label_column`; got a "
            f"{type(item).__name__}{f' of length {len(item)}' if isinstance(item, (list, tuple)) else ''}."
        )
    return None


def _dataset_batches(
    dataset: Any,
    batch_size: int,
    image_column: str | None,
    label_column: str | None,
    shape: tuple[int, int, int],
    classes: _Classes,
) -> _SizedBatches:
    datasets = sys.modules["datasets"]
    features = dataset.features
    names = list(dataset.column_names)
    label_name = _dataset_label_column(dataset, label_column, required=classes.num_classes is not None)
    labels_of = _dataset_labels(dataset, label_name, classes) if classes.num_classes is not None else None
    image_features = [name for name in names if isinstance(features[name], datasets.Image)]
    column = _pick_column(names, image_features, image_column, "dataset's columns")
    convert: Callable[[Any, int], torch.Tensor]
    if isinstance(features[column], datasets.Image):
        source = dataset.with_format(None)

        def convert(examples: Any, start: int) -> torch.Tensor:
            return torch.stack(
                [
                    _checked_image(image, shape, f"image {start + offset} of the dataset")
                    for offset, image in enumerate(examples)
                ]
            )

    else:
        dtype = _feature_dtype(features[column])
        if dtype != "uint8":
            raise TypeError(
                f"The dataset column {column!r} holds {dtype} values; bits_per_dim needs 8-bit images: a "
                "column of PIL images (datasets.Image) or of uint8 arrays of shape (C, H, W)."
            )
        source = dataset.with_format("torch", columns=[column])

        def convert(examples: Any, start: int) -> torch.Tensor:
            # The column is declared uint8, so every value is in 0..255 (the torch format widens it to int64).
            tensors = [tensor.to(torch.uint8) for tensor in examples]
            for offset, tensor in enumerate(tensors):
                _check_batch(tensor.unsqueeze(0), shape, f"image {start + offset} of the dataset")
            return torch.stack(tensors)

    starts = range(0, len(dataset), batch_size)
    batches = (
        (
            convert(source[start : start + batch_size][column], start),
            None if labels_of is None else labels_of(start, min(start + batch_size, len(dataset))),
        )
        for start in starts
    )
    return _SizedBatches(batches, len(starts))


def _dataset_label_column(dataset: Any, label_column: str | None, required: bool) -> str | None:
    """The dataset's label column: `label_column` (which must exist), else its only `datasets.ClassLabel` column;
    None when there is none and none is required."""
    datasets = sys.modules["datasets"]
    names = list(dataset.column_names)
    if label_column is not None:
        if label_column not in names:
            raise ValueError(f"`label_column` {label_column!r} is not among the dataset's columns: {names}.")
        return label_column
    class_label_columns = [name for name in names if isinstance(dataset.features[name], datasets.ClassLabel)]
    if len(class_label_columns) == 1:
        return class_label_columns[0]
    if required:
        raise ValueError(
            f"This pipeline is class-conditional, and the dataset has {len(class_label_columns) or 'no'} "
            f"datasets.ClassLabel column(s) among its columns {names}, so it cannot tell which holds the class "
            "labels; pass `label_column`."
        )
    return None


def _dataset_labels(dataset: Any, column: str, classes: _Classes) -> Callable[[int, int], torch.Tensor]:
    """A function (start, stop) -> the checked int64 labels of those examples of the column."""
    dtype = _feature_dtype(dataset.features[column])
    if dtype not in INTEGER_DTYPES:
        raise TypeError(
            f"The dataset column {column!r} holds {dtype} values; class labels must be integers (a "
            "datasets.ClassLabel or an integer datasets.Value column)."
        )
    source = dataset.select_columns([column]).with_format(None)

    def labels_of(start: int, stop: int) -> torch.Tensor:
        what = f"the labels of examples {start} .. {stop - 1} of the dataset (column {column!r})"
        values = source[start:stop][column]
        if any(value is None for value in values):
            raise ValueError(f"{what} include missing values (None); every image needs a class label.")
        return _check_labels(torch.tensor(values, dtype=torch.int64), stop - start, classes, what)

    return labels_of


def _checked_image(image: Any, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """A PIL image of a dataset as an exact uint8 tensor (C, H, W) of the model's shape."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL image, got {type(image).__name__}.")
    tensor = image_to_uint8(image, what)
    check_image_shape(tensor, shape, what)
    return tensor


def _feature_dtype(feature: Any) -> str | None:
    """The value dtype of a datasets feature (arrays, sequences and lists of values), or None."""
    while feature is not None:
        dtype = getattr(feature, "dtype", None)
        if isinstance(dtype, str):
            return dtype
        feature = getattr(feature, "feature", None)
    return None
