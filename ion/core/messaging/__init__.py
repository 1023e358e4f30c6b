"""Messages, their wire codec, and the transports that carry them.

The :class:`~ion.core.messaging.transport.Transport` interface is all that
processes and conversations see; ``memory://`` (the embedded broker) and
``amqp://`` (RabbitMQ) implement it.
"""
