"""Building and initialising the network (ImageNet from timm's hub, scratch, a weights file),
parameter groups, checkpoints and weight transfer between phases (:mod:`dtl.model.net` is the
network itself). Weights move between phases by ``backbone.*`` keys only: the old head is dropped,
and anything missing or unexpected outside the head is an error that names the keys.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import huggingface_hub.constants as hf
import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg

from dtl import DTLError
from dtl.model.net import DTLNet, ModelSpec
from dtl.model.preprocess import InputSpec

REAL_BACKBONES = ("resnet50", "efficientnet_b3", "inception_v3")


def check_backbone(name: str) -> None:
    """Fail with the valid names when timm does not know ``name``."""
    if not timm.is_model(name.split(".")[0]) and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0].split('.')[0]}*")[:10]
        raise DTLError(f"unknown backbone {name!r}. Real profile: {', '.join(REAL_BACKBONES)}; tiny CPU "
                       f"models: {', '.join(timm.list_models('test_*'))}; any timm CNN name works"
                       + (f" (similar: {', '.join(close)})" if close else ""))


def resolve_input_spec(backbone: str, image_size: int = 0) -> InputSpec:
    """Input size, crop, interpolation, mean and std from timm's data config for the model: the
    pretrained tag named in ``backbone`` (``resnet50.tv_in1k``), else timm's default tag for it
    (``resnet50`` = ``resnet50.a1_in1k``). The tag is recorded in the spec."""
    m = timm.create_model(backbone, pretrained=False, num_classes=0)
    dc = timm.data.resolve_model_data_config(m)
    size = image_size or dc["input_size"][-1]
    crop = float(dc.get("crop_pct", 0.875))
    cfg = m.pretrained_cfg or {}
    tag = ".".join(p for p in (cfg.get("architecture", backbone.split(".")[0]), cfg.get("tag")) if p)
    return InputSpec(size=size, cache_size=int(round(size / crop)), mean=tuple(dc["mean"]),
                     std=tuple(dc["std"]), interpolation=dc.get("interpolation", "bicubic"), pretrained=tag)


def preprocessing_note(backbone: str, init: str, spec: InputSpec) -> str | None:
    """What a ``file:`` init on a backbone named without a pretrained tag preprocesses with (timm's
    default tag's), and how to name the file's own tag; None when there is nothing to say. A file
    cannot tell which ImageNet recipe made it: torchvision's ResNet-50 file has timm's key names."""
    if not init.startswith("file:") or "." in backbone:
        return None
    tags = timm.list_pretrained(f"{backbone}.*")
    return (f"note: {init} on {backbone} is preprocessed as timm's default weights: {spec.describe()}; "
            "if the file holds other weights, name their tag as the backbone"
            + (f" (one of: {', '.join(tags)})" if tags else "") + ".")


def build_model(spec: ModelSpec, init: str = "scratch") -> DTLNet:
    """Build the network and initialise its backbone: ``imagenet`` (timm hub), ``scratch`` or
    ``file:PATH`` (timm/torch weights or a dtl checkpoint). Run/model URIs are resolved to a
    file by the caller (``dtl.phases``)."""
    check_backbone(spec.backbone)
    if init == "imagenet":
        return _imagenet(spec)
    net = DTLNet(spec, pretrained=False)
    if init == "scratch":
        return net
    if init.startswith("file:"):
        load_backbone_weights(net, read_weights(Path(init[5:])), init)
        return net
    raise DTLError(f"init={init!r} is not valid here; choose imagenet, scratch or file:PATH")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _weights_hint(backbone: str) -> str:
    return f"Use init=file:/path/to/{backbone}.safetensors (timm weights downloaded elsewhere) or init=scratch."


def _offline_error(backbone: str, offline: bool) -> DTLError:
    return DTLError(f"ImageNet weights for {backbone} ({_hub_id(backbone)}) are not in the local hub "
                    f"cache ({hf.HF_HUB_CACHE}, set by HF_HUB_CACHE or HF_HOME) and the timm hub (huggingface.co) "
                    f"is not reachable{' (HF_HUB_OFFLINE=1)' if offline else ''}: offline. {_weights_hint(backbone)}")


def check_imagenet(backbone: str) -> None:
    """Fail before any training when ``backbone``'s ImageNet weights are neither in the hub cache
    nor downloadable (offline), with the error :func:`build_model` would give in the first trial."""
    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:  # url-only weights (torch hub cache) or none: build_model says what it finds
        return
    repo, _, rev = cfg.hf_hub_id.partition("@")
    names = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    if any(isinstance(try_to_load_from_cache(repo, n, revision=rev or None), str) for n in names):
        return
    if hf.HF_HUB_OFFLINE or not _hub_reachable():
        raise _offline_error(backbone, hf.HF_HUB_OFFLINE)


def _hub_id(backbone: str) -> str:
    """The hub repository timm reads ``backbone``'s ImageNet weights from (``timm/resnet50.a1_in1k``)."""
    cfg = get_pretrained_cfg(backbone)  # timm's registry entry: no model is built
    return (cfg and (cfg.hf_hub_id or cfg.url)) or "no hub weights"


def _imagenet(spec: ModelSpec) -> DTLNet:
    """ImageNet weights from timm's hub: the local hub cache first, then the network; offline
    this fails at once (no retries against an unreachable host) with what to do instead."""
    saved = hf.HF_HUB_OFFLINE
    try:
        hf.HF_HUB_OFFLINE = True  # cached weights need no network
        return _with_pretrained_aux(DTLNet(spec, pretrained=True))
    except Exception:
        pass
    finally:
        hf.HF_HUB_OFFLINE = saved
    if saved or not _hub_reachable():
        raise _offline_error(spec.backbone, saved)
    try:
        return _with_pretrained_aux(DTLNet(spec, pretrained=True))
    except Exception as e:  # network, hub or missing-weights errors all mean the same to the user
        raise DTLError(f"could not load ImageNet weights for {spec.backbone} from the timm hub "
                       f"({type(e).__name__}: {str(e)[:200]}). {_weights_hint(spec.backbone)}") from None


def _with_pretrained_aux(net: DTLNet) -> DTLNet:
    """Keep InceptionV3's pretrained auxiliary classifier (the torchvision weights have one; timm
    drops it when the model is built without ``aux_logits``)."""
    if net.aux_head is not None:
        full = timm.create_model(net.spec.backbone, pretrained=True, aux_logits=True)
        if full.pretrained_cfg.get("tag") == "tv_in1k":  # timm's other InceptionV3 weights have no aux head
            _take_aux_weights(net, {f"AuxLogits.{k}": v for k, v in full.AuxLogits.state_dict().items()},
                              f"timm {net.spec.backbone}")
    return net


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file, never unpickling code."""
    if not path.exists():
        raise DTLError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DTLError(f"cannot read weights from {path}: {str(e)[:300]}") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise DTLError(f"{path} does not hold a state dict")
    return obj


def load_backbone_weights(net: DTLNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load backbone weights from a dtl checkpoint (``backbone.*`` keys; the old head is
    dropped) or a plain timm state dict (its classifier is dropped). Anything else missing or
    unexpected fails with the key names."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = _take_aux_weights(net, state, source)
    if any(k.startswith("backbone.") for k in state):
        sd = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        stray = [k for k in state if not k.startswith(("backbone.", "head.", "aux_head."))]
    else:
        classifier = net.backbone.pretrained_cfg.get("classifier", "fc")
        classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        sd = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
        stray = []
    try:
        missing, unexpected = net.backbone.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise DTLError(f"weights from {source} do not fit backbone {net.spec.backbone} "
                       f"(another architecture?): {str(e)[:600]}") from None
    bad = list(missing) + list(unexpected) + stray
    if bad:
        raise DTLError(f"weights from {source} do not match backbone {net.spec.backbone}: "
                       f"missing {list(missing)[:10]}, unexpected {(list(unexpected) + stray)[:10]} "
                       f"({len(bad)} keys); only head keys may differ")


AUX_PREFIXES = ("AuxLogits.", "aux_head.")  # timm/torchvision InceptionV3, and a dtl checkpoint


def _take_aux_weights(net: DTLNet, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """InceptionV3's auxiliary classifier: its two conv blocks go onto ``net.aux_head`` (its ``fc``
    has the source's class count, so it stays new); without an auxiliary head they are dropped with
    a warning. Returns the state without the auxiliary keys."""
    aux = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(AUX_PREFIXES)}
    rest = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}
    if not aux:
        return rest
    convs = {k: v for k, v in aux.items() if not k.startswith("fc.")}
    if net.aux_head is None:
        warnings.warn(f"{source}: {len(aux)} auxiliary-classifier weights dropped ({net.spec.backbone} is built "
                      "without an auxiliary head; aux_weight > 0 uses them)", stacklevel=3)
        return rest
    try:
        missing, unexpected = net.aux_head.load_state_dict(convs, strict=False)
    except RuntimeError as e:
        raise DTLError(f"auxiliary-head weights from {source} do not fit: {str(e)[:300]}") from None
    bad = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
    if bad:
        raise DTLError(f"auxiliary-head weights from {source} do not match: {bad[:10]}")
    return rest


def param_groups(net: DTLNet, lr_head: float, lr_backbone: float, weight_decay: float) -> list[dict]:
    """Discriminative learning rates; no weight decay on biases and normalisation weights."""
    groups = []
    heads = [net.head] + ([net.aux_head] if net.aux_head is not None else [])
    for name, params, lr in (("head", [p for h in heads for p in h.parameters()], lr_head),
                             ("backbone", list(net.backbone.parameters()), lr_backbone)):
        decay = [p for p in params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": name})
    return groups


def save_checkpoint(path: Path, net: DTLNet, meta: dict, **state) -> Path:
    """Atomic, self-describing checkpoint: weights, spec/meta (plain JSON types) and any
    training state (optimizer, scaler, epoch); readable with ``weights_only=True``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"model": net.state_dict(), "meta": {**meta, "spec": net.spec.to_dict()}, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict:
    if not Path(path).exists():
        raise DTLError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DTLError(f"cannot read checkpoint {path}: {str(e)[:300]}") from None


def model_from_checkpoint(path: Path) -> tuple[DTLNet, dict]:
    ckpt = load_checkpoint(path)
    spec = ModelSpec.from_dict(ckpt["meta"]["spec"])
    net = DTLNet(spec)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise DTLError(f"checkpoint {path} does not fit its own spec: {str(e)[:300]}") from None
    return net, ckpt["meta"]
