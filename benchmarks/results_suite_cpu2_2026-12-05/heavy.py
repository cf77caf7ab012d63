# one heavy process beside the suite: one core busy with float work, for as long as it lives
import time
x = 1.0001
while True:
    for _ in range(10_000_000):
        x = x * 1.0000001 % 7.0
