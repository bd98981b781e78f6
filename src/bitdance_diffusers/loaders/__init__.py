from .lora import BitDanceLoraLoaderMixin, add_lora_adapter, adapter_state_and_config


__all__ = ["BitDanceLoraLoaderMixin", "add_lora_adapter", "adapter_state_and_config"]
