"""BUSGen's diffusion core: condition encoders (`conditions`), the conditional UNet (`model`), the noise
schedule and loss (`schedule`), guided samplers (`sample`), training (`train`), checkpoints, box priors,
generation plans and the sharded writer (`plan`, `generate`, `pipeline`).

Import the modules themselves: nothing is re-exported here, so `import busgen_lib.diffusion.plan` does
not pay for importing diffusers.
"""
