"""RayExecutor: the tensor-parallel ranks as Ray actors, which may span nodes.

The actors are placed with a placement group (one bundle per rank: the platform's Ray
resource, e.g. ``GPU`` or ``CPU``), so Ray reserves every rank before any starts. Each
actor runs the same ``create_worker`` as a multiproc rank. A step is encoded once with
msgspec, put in Ray's object store once, and every actor reads it; only rank 0 returns
the sampled tokens. If an actor dies, the call fails with a WorkerError and the other
actors are killed.

Ray connects to the cluster named by ``RAY_ADDRESS`` or, if none, to the one this process
already started with ``ray.init``; otherwise it starts a local one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import msgspec

from piston.executor.abstract import Executor
from piston.hal.interface import Platform
from piston.step.config import EngineConfig
from piston.step.runner_output import ModelRunnerOutput, RequestFailedError
from piston.step.worker_messages import WorkerReply
from piston.step.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)


class RayWorkerActor:
    """One rank inside a Ray actor (wrapped with ``ray.remote`` at run time)."""

    def __init__(self, config_bytes: bytes, rank: int, world_size: int) -> None:
        from piston.logger import configure_logging

        configure_logging()
        self.config_bytes = config_bytes
        self.rank = rank
        self.world_size = world_size
        self.worker = None
        self.decoder = msgspec.msgpack.Decoder(SchedulerOutput)
        self.encoder = msgspec.msgpack.Encoder()

    def node_address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port on it (rank 0 hosts the group's rendezvous)."""
        import ray

        from piston.executor.multiproc import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def start(self, init_method: str) -> int:
        from piston.executor.worker_factory import create_worker
        from piston.hal.registry import get_platform
        from piston.step.config_codec import decode_engine_config

        config = decode_engine_config(self.config_bytes)
        platform = get_platform(config.platform or None)
        self.worker = create_worker(config, platform, self.rank, self.world_size, init_method)
        self.worker.load_model()
        return os.getpid()

    def execute_model(self, scheduler_output: bytes) -> bytes | None:
        """Rank 0's WorkerReply (the step, or the requests that failed it), encoded."""
        try:
            output = self.worker.execute_model(self.decoder.decode(scheduler_output))
        except RequestFailedError as e:  # every rank fails the same requests
            reply = WorkerReply(self.rank, "step_failed", error=e.message, failed_req_ids=e.req_ids)
        else:
            reply = WorkerReply(self.rank, "step", output=output)
        return self.encoder.encode(reply) if self.rank == 0 else None

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return msgspec.to_builtins(self.worker.call(method, *args, **kwargs))


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, platform: type[Platform]) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'piston[ray]'.") from e
        from piston.step.config_codec import encode_engine_config

        super().__init__(config, platform)
        self.ray = ray
        self._remove_pg = remove_placement_group
        self.actors: list[Any] = []
        self.pg = None
        start = time.perf_counter()
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                     log_to_driver=True)
        resource = platform.ray_resource()
        bundles = [{resource: 1.0}] * self.world_size
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=120)
        except Exception as e:
            self.shutdown()
            raise RuntimeError(
                f"Ray could not reserve {self.world_size} x {{{resource!r}: 1}} for tensor_parallel_size="
                f"{self.world_size}: the cluster has {ray.cluster_resources()}.") from e
        actor_cls = ray.remote(RayWorkerActor)
        config_bytes = encode_engine_config(config)
        env = {"PISTON_PLATFORM": platform.name}
        for key in ("PISTON_CPU_THREADS", "HF_HUB_OFFLINE", "PISTON_CACHE_DIR", "PYTHONPATH"):
            if key in os.environ:
                env[key] = os.environ[key]
        try:
            for rank in range(self.world_size):
                strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                           placement_group_bundle_index=rank)
                opts: dict[str, Any] = dict(scheduling_strategy=strategy, runtime_env={"env_vars": env})
                if resource == "GPU":
                    opts["num_gpus"] = 1
                elif resource == "CPU":
                    opts["num_cpus"] = 1
                else:
                    opts["resources"] = {resource: 1.0}
                self.actors.append(actor_cls.options(**opts).remote(config_bytes, rank, self.world_size))
            ip, port = self._get(self.actors[0].node_address.remote())
            pids = self._get([a.start.remote(f"tcp://{ip}:{port}") for a in self.actors])
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d Ray workers (pids %s) ready in %.1f s; rendezvous at %s:%d.", self.world_size,
                    ", ".join(map(str, pids)), time.perf_counter() - start, ip, port)

    def _get(self, refs: Any) -> Any:
        """ray.get that turns a dead actor or a worker exception into a WorkerError and
        shuts every actor down."""
        if self.dead is not None:
            raise self.dead
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayActorError as e:
            self._fail(f"A Ray worker died unexpectedly: {e}")
        except self.ray.exceptions.RayTaskError as e:
            self._fail(f"A Ray worker failed:\n{e}")

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        ref = self.ray.put(msgspec.msgpack.encode(scheduler_output))
        results = self._get([a.execute_model.remote(ref) for a in self.actors])
        reply = msgspec.msgpack.decode(results[0], type=WorkerReply)
        if reply.kind == "step_failed":
            raise RequestFailedError(reply.failed_req_ids, reply.error)
        return reply.output

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        return self._get([a.call.remote(method, tuple(args), kwargs or {}) for a in self.actors])

    def shutdown(self) -> None:
        actors, self.actors = self.actors, []
        for actor in actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        if self.pg is not None:
            try:
                self._remove_pg(self.pg)
            except Exception:
                pass
            self.pg = None
