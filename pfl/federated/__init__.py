"""The federated core: the algorithm contract (:mod:`.base`), the one round loop (:mod:`.engine`), payloads, device
models and the local update (:mod:`.local`), evaluators (:mod:`.evaluation`), named state (:mod:`.state`), personal
models kept beside a global one (:mod:`.personal`), client stores (:mod:`.store`), checkpoints (:mod:`.checkpoint`)
and the batched paths (:mod:`.vectorized`, :mod:`.inference`). Algorithms live in :mod:`pfl.algorithms`, one module
each, on this contract."""
