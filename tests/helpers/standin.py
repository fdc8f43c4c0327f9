"""A tiny stand-in score network with the UNets' call signature, for evaluation tests (fast on CPU)."""
import torch
import torch.nn as nn


class StandIn(nn.Module):
    """forward(x, labels) like the UNets; tiny and fast."""

    def __init__(self, channels):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()

    def forward(self, x, labels):
        return torch.tanh(self.conv(x)) * (0.5 + 0.5 * torch.sigmoid(labels / 999.0)).view(-1, 1, 1, 1)
