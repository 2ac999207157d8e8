from dandelion_p2p.worker.cli import worker_command

if __name__ == "__main__":
    worker_command()
