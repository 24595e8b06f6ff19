"""The hub: rollout engine, fleet registry, TinyDB store, HTTP bridge.

Import what you need from its modules (``hub.service.HubService``,
``hub.config.HubConfig``, ``hub.core.registry.Registry``, ``hub.store.Store``): the
package imports nothing itself, so ``import hub.core.engine`` (pure) does not pull
in the MQTT client, TinyDB or FastAPI.
"""

__all__: list[str] = []
