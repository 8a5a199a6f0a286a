"""Parameter shapes of common models, from plain ``nn.Module`` definitions kept here (no
torchvision / transformers needed). The models are built on the meta device: no memory is used,
even for the 1.3 B transformer.

Every definition reproduces its reference's parameter tensors (count, order and shapes):

| name       | reference                                              | parameters  | tensors |
| ---------- | ------------------------------------------------------ | ----------- | ------- |
| resnet18   | torchvision resnet18 (ImageNet, 1000 classes)          | 11,689,512  | 62      |
| resnet50   | torchvision resnet50 (ImageNet, 1000 classes)          | 25,557,032  | 161     |
| vit_b16    | torchvision vit_b_16 (224x224, 1000 classes)           | 86,567,656  | 152     |
| gpt2       | GPT-2 small, 124 M (HF gpt2, lm_head tied to wte)      | 124,439,808 | 148     |
| gpt_1_3b   | GPT-3 XL shapes: 24 layers, d=2048, ctx 2048, tied     | 1,315,723,264 | 292   |

``python benchmarks/model_shapes.py`` prints the table.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["MODELS", "build", "param_shapes", "param_count", "ResNet", "VisionTransformer", "GPT"]


# -- ResNet (He et al. 2016; torchvision layout, v1.5: stride on the 3x3 conv) -----------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """``small_input=True``: the CIFAR variant (3x3 stride-1 stem, no max-pool)."""

    def __init__(self, block, layers: List[int], num_classes: int = 1000, small_input: bool = False) -> None:
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make(block, 64, layers[0], 1)
        self.layer2 = self._make(block, 128, layers[1], 2)
        self.layer3 = self._make(block, 256, layers[2], 2)
        self.layer4 = self._make(block, 512, layers[3], 2)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- ViT-B/16 (Dosovitskiy et al. 2021; torchvision layout) --------------------------------------
class _EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image: int = 224, patch: int = 16, layers: int = 12, d: int = 768, heads: int = 12,
                 mlp: int = 3072, num_classes: int = 1000) -> None:
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        seq = (image // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, d).normal_(std=0.02))
        self.layers = nn.Sequential(*[_EncoderBlock(d, heads, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


# -- GPT (Radford et al. 2019; GPT-2 layout, lm_head tied to the token embedding) ----------------
class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, layers: int = 12, d: int = 768, heads: int = 12, vocab: int = 50257, ctx: int = 1024) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.Sequential(*[_GPTBlock(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return F.linear(self.ln_f(self.h(x)), self.wte.weight)      # tied lm_head


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
    "vit_b16": lambda: VisionTransformer(),
    "gpt2": lambda: GPT(12, 768, 12, 50257, 1024),
    "gpt_1_3b": lambda: GPT(24, 2048, 16, 50257, 2048),
}
DESCRIPTIONS = {
    "resnet18": "ResNet-18 (ImageNet)", "resnet50": "ResNet-50 (ImageNet)", "vit_b16": "ViT-B/16",
    "gpt2": "GPT-2 124M", "gpt_1_3b": "GPT 1.3B (GPT-3 XL shapes)",
}


def build(name: str, device="meta", **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {list(MODELS)}")
    with torch.device(device):
        return MODELS[name](**kwargs) if kwargs else MODELS[name]()


def param_shapes(name: str) -> List[Tuple[int, ...]]:
    """Shapes of the model's parameters, in ``model.parameters()`` order (built on meta)."""
    return [tuple(p.shape) for p in build(name).parameters()]


def param_count(name: str) -> int:
    return sum(math.prod(s) for s in param_shapes(name))


if __name__ == "__main__":
    for name in MODELS:
        shapes = param_shapes(name)
        print(f"{name:10s} {DESCRIPTIONS[name]:28s} {sum(math.prod(s) for s in shapes):>14,d} params "
              f"{len(shapes):4d} tensors")
