"""kopf handlers, cluster observation, apply and rescheduling (I/O)."""
