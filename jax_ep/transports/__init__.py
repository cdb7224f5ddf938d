"""How the ranks of a group find each other's buffers.

* :mod:`~jax_ep.transports.kv_store`: bytes between the processes of a ``jax.distributed``
  job (JAX's coordination-service key-value store), with bounded waits;
* :mod:`~jax_ep.transports.cuda_ipc`: peer access inside a process, CUDA IPC handles
  across processes (one host);
* :mod:`~jax_ep.transports.nvshmem_bootstrap`: NVSHMEM (one process per GPU, across
  nodes): bootstrap, symmetric heap, peer mappings.
"""
