"""Stand-in denoisers for the objective and sampler tests (the real NextDiT is exercised in test_overfit.py)."""

import torch


class OracleDenoiser(torch.nn.Module):
    """Knows the data x0 (one per text id) and returns the exact flow velocity (x_σ − x0)/σ = ε − x0.

    The text states carry the id of the x0 to aim for in channel 0 of token 0."""

    def __init__(self, targets: torch.Tensor):
        super().__init__()
        self.register_buffer("targets", targets)  # (K, T, C, h, w)
        self.calls = []

    def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
        self.calls.append(dict(samples=samples.clone(), timesteps=timesteps.clone(),
                               text=encoder_hidden_states.clone(), mask=encoder_attention_mask.clone()))
        ids = encoder_hidden_states[:, 0, 0].round().long()
        x0 = self.targets[ids]
        sigma = timesteps / 1000.0
        while sigma.dim() < samples.dim():  # (B,) or (B, T) times
            sigma = sigma[..., None]
        return (samples - x0) / sigma.clamp_min(1e-6)


class ConstantVelocity(torch.nn.Module):
    """v = a for text id 1, b for text id 0 (lets CFG be checked in closed form)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b
        self.batch_sizes = []

    def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
        self.batch_sizes.append(samples.shape[0])
        ids = encoder_hidden_states[:, 0, 0].reshape(-1, *([1] * (samples.dim() - 1)))
        return torch.where(ids > 0.5, torch.full_like(samples, self.a), torch.full_like(samples, self.b))


class TinyDenoiser(torch.nn.Module):
    """A small trainable per-view network: enough to check the loss has gradients and can be minimised."""

    def __init__(self, channels=16, text_dim=8):
        super().__init__()
        self.time = torch.nn.Linear(1, channels)
        self.text = torch.nn.Linear(text_dim, channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
        b, t, c, h, w = samples.shape
        if timesteps.dim() == 5:  # per element, constant per view
            timesteps = timesteps[:, :, 0, 0, 0]
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(b, t)
        time = self.time(timesteps[..., None] / 1000.0)  # (B, T, C)
        mask = encoder_attention_mask.float()[..., None]
        pooled = (encoder_hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1)
        text = self.text(pooled)[:, None]  # (B, 1, C)
        x = self.conv(samples.reshape(b * t, c, h, w)).reshape(b, t, c, h, w)
        return x + (time + text)[..., None, None]


def text_with_id(ids, length=4, dim=8):
    states = torch.zeros(len(ids), length, dim)
    states[:, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    mask = torch.ones(len(ids), length, dtype=torch.long)
    return states, mask




class RecordingZero(torch.nn.Module):
    """Returns v = 0 and records every call's inputs (samples, timesteps, text, mask), e.g. to compare the times the
    sampler and the training objective give condition views."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
        self.calls.append(dict(samples=samples.detach().clone(), timesteps=timesteps.detach().clone(),
                               text=encoder_hidden_states.detach().clone(), mask=encoder_attention_mask.clone()))
        return torch.zeros_like(samples)
