"""splitserve.workers"""
