from .lora import BitDanceLoraLoaderMixin, add_lora_adapter, adapter_state_and_config
from .pretrained import BitDancePretrainedMixin


__all__ = ["BitDanceLoraLoaderMixin", "BitDancePretrainedMixin", "add_lora_adapter", "adapter_state_and_config"]
