from align.run import main

main()
