from modules.fifo_lock import FIFOLock

queue_lock = FIFOLock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


wrap_gradio_gpu_call = wrap_queued_call
