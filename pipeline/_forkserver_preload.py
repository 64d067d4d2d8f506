"""Imported only inside the DataLoader workers' forkserver (torch_baseline._worker_context names it in
set_forkserver_preload); never import it elsewhere: importing it makes the importing process end with its
parent.

The forkserver is a child of the trainer, and the workers are children of the forkserver. Measured here
(2026-12-02, torch 2.14, Python 3.11): after `kill -9` of the trainer, the forkserver, its workers and the
resource tracker all stayed alive. The forkserver only leaves when the last holder of its "alive" pipe ends,
and multiprocessing hands that pipe to every worker it forks; torch's workers only watch their own parent,
the forkserver. So each waited for the other. Armed here, the forkserver is killed by the kernel when the
trainer dies; the workers (armed in their worker_init_fn) then die with the forkserver, and the resource
tracker leaves once nobody holds its pipe.
"""
from imt.pipeline.orphans import exit_with_parent

exit_with_parent()
